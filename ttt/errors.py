"""User errors: anything a user can fix by changing an input. The CLI prints the message
as one line and exits with code 2, never with a traceback."""


class UserError(Exception):
    exit_code = 2


class Interrupted(Exception):
    """A command stopped by a signal. The CLI prints the message as one line (what was
    kept and how to go on) and exits with 128 + the signal's number (130 for Ctrl-C)."""

    def __init__(self, message: str = "interrupted", signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + signum


# What would fit instead, by command, when a device runs out of memory.
OOM_HINTS = {
    "train": "a smaller data.batch_size (with train.grad_accum), model.remat=block, or a "
    "shorter data.seq_len",
    "eval": "a shorter --seq-len or a smaller --batch-size; full attention's memory grows with "
    "the context, swa and ttt_e2e keep a fixed state",
    "generate": "a shorter prompt or fewer --max-new-tokens; full attention's cache grows with "
    "the context, swa and ttt_e2e keep a fixed state",
}


def out_of_memory(e: BaseException, command: str) -> str | None:
    """One line for an XLA out-of-memory error (what did not fit, and what would); None
    for any other error."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "Out of memory" in ln), lines[0])
    detail = detail.replace("RESOURCE_EXHAUSTED: ", "")[:200]
    hint = OOM_HINTS.get(command, "smaller shapes")
    return f"out of memory: {detail}; try {hint}"
