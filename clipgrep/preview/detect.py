"""Which image protocol the terminal speaks, guessed from the environment (no terminal queries).

Environment variables survive tmux and (for TERM and LC_*) ssh, where asking the terminal
would need a round trip through both.
"""
from __future__ import annotations

from collections.abc import Mapping

PROTOCOLS = ("kitty", "iterm", "sixel", "blocks")


def detect_protocol(env: Mapping[str, str]) -> str:
    """The best protocol for the terminal described by ``env``; "blocks" works everywhere."""
    term = env.get("TERM", "")
    program = env.get("TERM_PROGRAM", "")
    lc_terminal = env.get("LC_TERMINAL", "")  # set by iTerm2 and forwarded by ssh's default SendEnv LC_*
    if env.get("KITTY_WINDOW_ID") or "kitty" in term or "ghostty" in term or program == "ghostty" \
            or env.get("GHOSTTY_RESOURCES_DIR") or env.get("KONSOLE_VERSION"):
        return "kitty"
    if program in ("iTerm.app", "WezTerm", "vscode") or lc_terminal in ("iTerm2", "WezTerm") \
            or env.get("WEZTERM_EXECUTABLE") or term == "wezterm":
        return "iterm"
    if term.startswith(("foot", "mlterm", "contour")) or term in ("xterm-sixel", "yaft-256color") \
            or env.get("WT_SESSION"):
        return "sixel"
    return "blocks"


def in_tmux(env: Mapping[str, str]) -> bool:
    return bool(env.get("TMUX")) or env.get("TERM_PROGRAM") == "tmux"


def truecolor(env: Mapping[str, str]) -> bool:
    """24-bit colour for half blocks; terminals with an image protocol all have it."""
    return env.get("COLORTERM", "") in ("truecolor", "24bit") or detect_protocol(env) != "blocks"
