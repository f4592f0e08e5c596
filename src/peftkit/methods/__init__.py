"""The adapter methods; importing this package registers each of them."""

from . import lora  # noqa: F401
from . import shira  # noqa: F401
from . import lokr  # noqa: F401
from . import ia3  # noqa: F401
from . import loha  # noqa: F401
from . import oft  # noqa: F401
from . import boft  # noqa: F401
from . import xlora  # noqa: F401
from .. import prompt  # noqa: F401  (prompt tuning, P-tuning)
