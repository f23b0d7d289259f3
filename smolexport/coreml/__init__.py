"""Core ML export: an ML Program whose KV cache lives in Core ML states, plus a NumPy reference interpreter."""

import logging
import warnings


def import_coremltools():
    """coremltools, imported quietly: off macOS it logs that its native Core ML proxies are missing (expected:
    conversion needs none) and warns about untested torch versions, on every import."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import coremltools
        except ImportError:
            from ..errors import SmolexportError

            raise SmolexportError("Core ML export needs coremltools: pip install 'smolexport[coreml]'") from None
    return coremltools
