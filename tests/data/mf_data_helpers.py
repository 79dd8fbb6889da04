"""Constants shared by the data tests (a uniquely named module, not conftest, so that
other test directories' conftest files never shadow it)."""
import itertools

from megafusion.data.dist_env import DistEnv

IMAGE_SIZE = 16
TOKENS_PER_IMAGE = (IMAGE_SIZE // 2) ** 2  # linear patcher, patch 2
SINGLE = DistEnv(0, 1, 0, 1)
RUNS = itertools.count()
