import pytest

from tests.distributed import harness


@pytest.fixture(scope="session")
def scenario_results(tmp_path_factory):
    """Launch each world size at most once per session, on first use; return a lookup by name."""
    out_dir = tmp_path_factory.mktemp("scenarios")
    launched = set()

    def ensure_launched(world_size: int):
        if world_size not in launched:
            launched.add(world_size)
            for earlier in sorted(harness.LAUNCH_FIRST.get(world_size, ())):
                ensure_launched(earlier)
            harness.launch(world_size, out_dir)

    def lookup(name: str):
        ensure_launched(harness.SCENARIOS[name][0])
        return harness.result(out_dir, name)

    harness.import_scenarios()
    return lookup
