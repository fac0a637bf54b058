"""What to install when a command needs what an extra of the distribution brings: the
one-line refusal, written once for every command that needs the model stack."""

from solaris.server.settings import SettingsError

DISTRIBUTION = "solaris-embeddings"
PROVIDES = {
    "model": ("the model stack", frozenset({"torch", "onnx", "onnxruntime", "onnxscript"})),
    "replay": (
        "the replay's packages (the model stack, matplotlib and tqdm)",
        frozenset({"torch", "onnx", "onnxruntime", "onnxscript", "matplotlib", "tqdm"}),
    ),
    "train": (
        "the training packages (the model stack and tqdm)",
        frozenset({"torch", "onnx", "onnxruntime", "onnxscript", "tqdm"}),
    ),
}
"""Each extra: what it is called in a message, and the top-level modules it installs."""


def provides(extra: str, missing: ModuleNotFoundError) -> bool:
    """Whether `missing` is a module that installing `extra` brings (and not, say, a bug)."""
    return (missing.name or "").partition(".")[0] in PROVIDES[extra][1]


def missing_extra(
    missing: ModuleNotFoundError, extra: str = "model", setting: str = "", otherwise: str = ""
) -> SettingsError:
    """The refusal of a command that needs `extra` where `missing` is not installed, saying
    what to install (and `otherwise`, another way out, if any)."""
    what = PROVIDES[extra][0]
    install = f"pip install '{DISTRIBUTION}[{extra}]' (from a checkout: pip install './[{extra}]')"
    alternative = f", or {otherwise}" if otherwise else ""
    return SettingsError(
        f"{what} is not installed ({missing.name} is missing): {install}{alternative}", setting
    )
