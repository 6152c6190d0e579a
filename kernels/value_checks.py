"""The debug switch for op input checks that look at the values (and so wait for the device).

Every op checks the shapes, dtypes and devices of its inputs on every call: that is free. Checks
on the values themselves (Sessa's gain |gamma| < 1, Mamba-2's A <= 0 and dt >= 0, segment ids
that are contiguous in time) read the data, which on a GPU stalls the stream once per call, so
they are off by default. Turn them on while debugging:

    ZOO_CHECK_VALUES=1 python tools/train.py ...     # for a whole process
    with value_checks.enabled():                     # for a block of code
        y = model(x)

The models check what they are given (tokens, segment ids) on every call either way.
"""

from __future__ import annotations

from kernels.switch import Switch

_switch = Switch("ZOO_CHECK_VALUES", default=False)
active = _switch.active  # () -> bool: whether op-level value checks run now
enabled = _switch.enabled  # (on=True): a block of code with the checks on (or off)
