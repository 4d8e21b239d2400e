"""The fuzz tier loads the programs as the datapath tier does."""

from ..datapath.conftest import dp  # noqa: F401  (the fixture)
