"""The distributed scenarios' launches (tests/distributed/harness.py) start in the background as the session
starts, and the test modules that read their results run after every other module: the others, which mostly
start processes and wait on them, leave the launches a core much of the time."""
import pytest

from tests.distributed import harness


def reads_scenarios(item: pytest.Item) -> bool:
    return "scenario_results" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole modules move, in their order, so that each module's fixtures are still set up once."""
    reading = {item.module for item in items if reads_scenarios(item)}
    items.sort(key=lambda item: getattr(item, "module", None) in reading)


@pytest.fixture(scope="session", autouse=True)
def scenario_launches(request, tmp_path_factory):
    """Every world size's launch, when this session holds a test that reads one; stopped as the session ends."""
    if not any(reads_scenarios(item) for item in request.session.items):
        yield None
        return
    harness.import_scenarios()
    launches = harness.BackgroundLaunches(tmp_path_factory.mktemp("scenarios"))
    yield launches
    launches.stop()


@pytest.fixture(scope="session")
def scenario_results(scenario_launches):
    """A lookup by scenario name: what its launch's rank 0 returned, once that launch has finished."""
    def lookup(name: str):
        scenario_launches.wait_for(harness.SCENARIOS[name][0])
        return harness.result(scenario_launches.out_dir, name)

    return lookup
