"""raydapt: adapt LLMs on Ray (fine-tuning, distillation, transfer learning) and serve them."""

__version__ = "0.1.0"

from raydapt.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
