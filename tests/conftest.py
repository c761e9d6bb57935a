"""Test setup: CPU with 8 virtual devices (set before jax is imported), shared fixtures."""

import gc
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, shared by the test processes (pytest-xdist workers and the
# train.py / infer.py runs the tests start, which inherit these variables): many tests compile
# the same programs (the tiny model's init, train step, decode step), and a cached one loads in
# a fraction of its compile time. The cache key covers the program, the compile options and
# flags, and the jax/jaxlib versions; a size limit turns on JAX's LRU eviction, whose file lock
# (the `filelock` package) makes the workers' reads and writes safe. DSV3_TEST_COMPILE_CACHE
# picks the directory; "off" disables it.
_CACHE = os.environ.get("DSV3_TEST_COMPILE_CACHE",
                        os.path.join(tempfile.gettempdir(), f"dsv3-jax-test-cache-{os.getuid()}"))
if _CACHE != "off":
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
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
