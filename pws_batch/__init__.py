"""pws-batch: batch generation of images that sound (Stable Diffusion + Auffusion on one shared latent)."""

import logging as _logging

__version__ = "0.1.0"


def _not_torchvision_fallback(record: _logging.LogRecord) -> bool:
    """transformers 5 warns, on every command, that its image processors fall back to their PIL versions without
    torchvision (diffusers names CLIP's and SigLIP's on import): that fallback is how the CLIP scorer runs here,
    so the line says nothing to a user. Every other record passes."""
    return "requires torchvision (not installed); falling back to" not in record.getMessage()


def _not_token_auth_notice(record: _logging.LogRecord) -> bool:
    """Ray 2.60 warns on every ray.init that token authentication is on (its default, which pws-batch keeps)."""
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


# on the loggers the lines come from, set before the libraries are imported (they take the same loggers)
_logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_fallback)
_logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_token_auth_notice)
