"""veRL's ``verl.plugins`` entry point for splitllama: imports :mod:`splitllama.verl`, loudly.

``import verl`` loads each ``verl.plugins`` entry point and logs a failure at debug level only, so
a broken install would leave veRL unable to find the split model with nothing said. This module
(top-level, so that a failure to import the ``splitllama`` package itself is caught too) writes
the error to stderr and to the ``splitllama.verl`` logger, then re-raises.
"""

from __future__ import annotations

import logging
import sys
import traceback

try:
    import splitllama.verl  # noqa: F401  (registers the split model with the Auto classes veRL uses)
except Exception as _exc:
    _message = (f"splitllama veRL plug-in FAILED to load ({type(_exc).__name__}: {_exc}); veRL will not find the "
                "split model (CustomSplitLLamaForCausalLM / CustomSplitLLamaForValue)")
    print(f"ERROR: {_message}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    logging.getLogger("splitllama.verl").error(_message)
    raise
