import pytest

from tests.distributed import harness


@pytest.fixture(scope="session")
def scenario_results(tmp_path_factory):
    """Launch each world size at most once per session, on first use; return a lookup by name."""
    out_dir = tmp_path_factory.mktemp("scenarios")
    launched = set()

    def lookup(name: str):
        world_size = harness.SCENARIOS[name][0]
        if world_size not in launched:
            launched.add(world_size)
            harness.launch(world_size, out_dir)
        return harness.result(out_dir, name)

    harness.import_scenarios()
    return lookup
