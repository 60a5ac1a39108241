"""Speaking: step-by-step multi-stream decoding of a text + speech answer.

Defined in `deeptalk/generation_deeptalk.py`, the remote-code file saved folders carry (so
`model.generate_speech(...)` works where deeptalk is not installed); see its docstring for the
strategies, the layout rules and the sampling.
"""

from ..generation_deeptalk import *  # noqa: F403
from ..generation_deeptalk import __all__  # noqa: F401
