"""Patch 5: insert_slice."""
from __future__ import annotations

from ..patch import CONFIGURATION_FILE, MODELING_FILE, Edit, Patch, anchored_patch


INSERT_SLICE_MODELING_EDITS = (
    Edit(
        """\
        hidden_states = outputs.last_hidden_state
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
""",
        """\
        hidden_states = outputs.last_hidden_state
        if getattr(self.config, "insert_slice", False):
            # Only the last position's logits choose the next token: slicing before lm_head saves
            # (T - 1) * hidden * vocab multiply-adds in prefill, a large share of a small model's work.
            if labels is not None:
                raise ValueError(
                    "insert_slice keeps only the last position's logits, so no loss: set config.insert_slice=False"
                )
            hidden_states = hidden_states[:, -1:, :]
        else:
            hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
""",
    ),
)

INSERT_SLICE_CONFIGURATION_EDITS = (
    Edit(
        '    r"""\n    Example:\n',
        '    r"""\n'
        "    insert_slice (`bool`, *optional*, defaults to `False`):\n"
        "        Slice the hidden states to the last position before `lm_head` (prefill computes one row of logits).\n"
        "\n    Example:\n",
    ),
    Edit(
        "    eos_token_id: int | list[int] | None = None\n",
        "    eos_token_id: int | list[int] | None = None\n"
        "    # Deploy packages (qwen2lib.deploy): slice the hidden states to the last position before lm_head\n"
        "    insert_slice: bool = False\n",
    ),
)


def insert_slice_patches() -> tuple[Patch, Patch]:
    description = (
        "When config.insert_slice is true, the hidden states are sliced to the last position before lm_head, "
        "so prefill computes 1 row of logits instead of T; the configuration gains an insert_slice field "
        "(default False)."
    )
    return (
        anchored_patch("insert_slice", description, MODELING_FILE, INSERT_SLICE_MODELING_EDITS),
        anchored_patch("insert_slice", description, CONFIGURATION_FILE, INSERT_SLICE_CONFIGURATION_EDITS),
    )


