"""What Parallax's machinery costs on one process: step time against a bare PyTorch loop and transformers.

One process, TP=1, ZeRO-0, fp32, the demo model of configs/gpt-tiny.yaml. A step is forward +
backward + global-norm clip at 1.0 + AdamW, for (a) Parallax's real engine (megatron-core layers
under DeepSpeed), (b) the same math written plainly in this file and (c) Hugging Face's
GPT2LMHeadModel of the same dimensions. The bare loop is the floor: anything Parallax spends
beyond it is overhead. Steps are interleaved round by round, in rotating order, on one batch and
one thread count, so load from other processes hits all three alike; medians shrug off the spikes.
Targets: Parallax <= 1.05x the bare loop and <= 0.9x transformers.

    .venv/bin/python bench/overhead.py [--steps 40] [--micro-batch 4] [--threads 2]

transformers is a bench-only dependency: pip install -e '.[bench]' (or make bench).
"""
import argparse
import logging
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "gpt-tiny.yaml"
VOCAB = 8192
WARMUP_ROUNDS = 5


class BareBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(hidden)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn.proj = nn.Linear(hidden, hidden)
        self.mlp_norm = nn.LayerNorm(hidden)
        self.mlp = nn.Module()
        self.mlp.fc_in = nn.Linear(hidden, 4 * hidden)
        self.mlp.fc_out = nn.Linear(4 * hidden, hidden)

    def forward(self, x):  # x: [b, s, h]
        b, s, h = x.shape
        head_dim = h // self.heads
        # Parallax's QKV rows run head by head ([q_i, k_i, v_i]); the same layout lets us load its weights.
        qkv = self.attn.qkv(self.attn_norm(x)).view(b, s, self.heads, 3 * head_dim).transpose(1, 2)
        q, k, v = qkv.split(head_dim, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.attn.proj(y)
        return x + self.mlp.fc_out(F.gelu(self.mlp.fc_in(self.mlp_norm(x)), approximate="tanh"))


class BareGPT(nn.Module):
    """The demo model with nothing but torch, named like Parallax's GPT so it can load Parallax's
    weights: equal losses then prove the bare loop does the same math, not a cheaper one."""

    def __init__(self, layers: int, hidden: int, heads: int, seq_len: int, vocab: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.position_embedding = nn.Embedding(seq_len, hidden)
        self.blocks = nn.ModuleList(BareBlock(hidden, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(hidden)

    def forward(self, x, y):
        h = self.embedding(x) + self.position_embedding(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        logits = F.linear(self.final_norm(h), self.embedding.weight)  # tied output embedding
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))


def adamw_like_parallax(model: nn.Module, cfg):
    """AdamW (torch's fused kernel), decay on matrices only, warmup+cosine: the optimizer and schedule
    Parallax's engine builds."""
    from parallel.engine import warmup_cosine

    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, o, cfg.train.steps) / o.lr)
    return opt, schedule


def plain_step(model, opt, schedule, loss_fn, grad_clip: float):
    """The step every bare-PyTorch training loop writes."""
    def step(x, y):
        loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def init_one_process():
    """The Topology of a world of one, for engines built in this process. It still rendezvouses
    over TCP; a free port keeps it clear of any run or test alongside."""
    from parallel.topology import init_topology

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    return init_topology(tp=1)


def engine_step(engine):
    """A training step through Parallax's engine (parallel/engine.py)."""
    def step(x, y):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss
    return step


def build_parallax(cfg):
    from models.gpt import GPT
    from parallel.engine import build_engine

    topo = init_one_process()  # before the model: its layers are built in megatron's groups
    engine = build_engine(GPT(cfg.model, VOCAB), cfg, topo)
    return engine.module, engine_step(engine)


def bare_copy(cfg, parallax_model: nn.Module, vocab_size: int) -> BareGPT:
    """A BareGPT holding `parallax_model`'s weights, on the same device."""
    m = cfg.model
    with torch.device(next(parallax_model.parameters()).device):
        model = BareGPT(m.num_layers, m.hidden_size, m.num_heads, m.max_seq_len, m.padded_vocab_size(vocab_size))
    model.load_state_dict(dict(parallax_model.named_parameters()))
    return model


def same_weights_losses(parallax_model: nn.Module, bare: BareGPT, x, y) -> tuple[float, float]:
    """Both models' losses on (x, y): equal, they prove the bare model does Parallax's math, not a cheaper one."""
    with torch.no_grad():
        return parallax_model(x, y).item(), bare(x, y).item()


def build_bare(cfg, parallax_model, x, y):
    model = bare_copy(cfg, parallax_model, VOCAB)
    ours, bare = same_weights_losses(parallax_model, model, x, y)
    if abs(ours - bare) > 1e-5:
        sys.exit(f"bench/overhead.py: the bare model is not Parallax's math: loss {bare} vs {ours}")
    opt, schedule = adamw_like_parallax(model, cfg)
    return plain_step(model, opt, schedule, lambda mdl, x, y: mdl(x, y), cfg.optim.grad_clip)


def gpt2_like(cfg, vocab_size: int):
    """transformers' GPT2LMHeadModel with SDPA attention and the dimensions of `cfg`, on torch's default device."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    config = GPT2Config(
        vocab_size=m.padded_vocab_size(vocab_size), n_positions=m.max_seq_len, n_embd=m.hidden_size,
        n_layer=m.num_layers, n_head=m.num_heads, activation_function="gelu_new", layer_norm_epsilon=m.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def transformers_loss(mdl, x, y):
    # Our own loss on (x, y): passing labels= would make transformers shift them by one.
    logits = mdl(input_ids=x).logits
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))


def build_transformers(cfg):
    model = gpt2_like(cfg, VOCAB)
    opt, schedule = adamw_like_parallax(model, cfg)
    return plain_step(model, opt, schedule, transformers_loss, cfg.optim.grad_clip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per system, after warm-up")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("bench/overhead.py needs transformers: pip install -e '.[bench]' (or run make bench)")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from launcher.config import load_config

    cfg = load_config(CONFIG, [
        "parallel.tp=1", "parallel.zero_stage=0", "train.precision=fp32", "train.grad_accum=1",
        f"model.vocab_size={VOCAB}", f"train.micro_batch_size={args.micro_batch}",
        f"train.steps={WARMUP_ROUNDS + args.steps}",
    ])
    torch.manual_seed(cfg.train.seed)
    tokens = torch.randint(0, VOCAB, (args.micro_batch, cfg.data.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    parallax_model, parallax = build_parallax(cfg)
    systems = {
        "parallax": parallax,
        "bare torch": build_bare(cfg, parallax_model, x, y),
        "transformers": build_transformers(cfg),
    }
    torch.set_num_threads(args.threads)  # after set-up, in case a library changed it
    # Wall time is what a user waits for; process CPU time barely moves when other jobs take the
    # cores away, so on a busy machine it is the steadier witness of how much work a step does.
    wall, cpu = {name: [] for name in systems}, {name: [] for name in systems}
    names = list(systems)
    for round_ in range(WARMUP_ROUNDS + args.steps):
        for name in names[round_ % 3:] + names[:round_ % 3]:  # rotate so no system always runs first
            start, start_cpu = time.perf_counter(), time.process_time()
            systems[name](x, y)
            if round_ >= WARMUP_ROUNDS:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    print(f"threads={torch.get_num_threads()} batch={args.micro_batch}x{cfg.data.seq_len} "
          f"steps={args.steps} (+{WARMUP_ROUNDS} warm-up rounds), interleaved")
    print(f"{'median ms/step':14}{'wall':>10}{'wall p25-p75':>17}{'cpu':>10}")
    for name in names:
        q = statistics.quantiles(wall[name], n=4)
        print(f"{name:14}{ms(wall[name]):10.1f}{q[0] * 1e3:11.1f}-{q[2] * 1e3:<6.1f}{ms(cpu[name]):10.1f}")
    for other, target in (("bare torch", 1.05), ("transformers", 0.9)):
        ratio = ms(wall["parallax"]) / ms(wall[other])
        verdict = "met" if ratio <= target else "MISSED"
        print(f"parallax / {other:13}{ratio:6.3f} wall, {ms(cpu['parallax']) / ms(cpu[other]):6.3f} cpu"
              f"  (target <= {target}: {verdict})")


def ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


if __name__ == "__main__":
    main()
