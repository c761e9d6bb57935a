"""Test setup: CPU with 8 virtual devices (set before jax is imported), shared fixtures."""

import gc
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def fixtures_dir():
  return FIXTURES


def fixture_path(name: str) -> str:
  return os.path.join(FIXTURES, name)


def _mapped_regions() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:
    return -1


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs(request):
  """Drops JAX's compiled programs after each test module.

  XLA:CPU keeps every compiled executable's machine code in memory maps of its own, and JAX's
  caches keep the executables alive: the whole suite in one process passed Linux's default limit
  of 65,530 maps per process (vm.max_map_count) and LLVM failed with "Cannot allocate memory" with
  gigabytes free. Modules share no compiled programs worth keeping."""
  yield
  if os.environ.get("DSV3_TEST_MAPS"):
    print(f"\n[{request.module.__name__}: {_mapped_regions()} memory maps before]")
  jax.clear_caches()
  gc.collect()
  if os.environ.get("DSV3_TEST_MAPS"):
    print(f"\n[{request.module.__name__}: {_mapped_regions()} memory maps after clearing]")
