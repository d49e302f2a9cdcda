"""Progress output: bars redrawn in place on a terminal, plain lines in a log file; libraries' bars
follow ``progress`` and are set back afterwards."""

import io

import pytest

from preftune import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_file_prints_plain_lines_without_carriage_returns():
    out = io.StringIO()
    bar = progress.bar(total=3, desc="train dpo", unit="step", stream=out, dynamic_ncols=True)
    for _ in range(3):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "█" not in text
    lines = text.splitlines()
    assert lines[0].startswith("train dpo: 0/3 step (0%)")
    assert lines[-1].startswith("train dpo: 3/3 step (100%)")
    assert len(lines) <= 3  # the start, the end: updates within PLAIN_INTERVAL_S print nothing


def test_a_bar_on_a_file_does_not_print_its_last_line_twice(monkeypatch):
    """close() redraws the last report; when that report was already printed (its update came after
    PLAIN_INTERVAL_S), a log file got "4/4 (100%)" twice."""
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    out = io.StringIO()
    bar = progress.bar(total=4, desc="reference 0 (policy) eval", unit="seq", stream=out)
    bar.update(2)
    bar.update(2)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" seq ")[1][:6] for line in lines] == ["(0%), ", "(50%),", "(100%)"]


def test_a_nested_bar_that_does_not_stay_leaves_no_cursor_moves_in_a_file():
    """The held-out evaluation's bar (leave=False) inside the training bar: tqdm moves the cursor up
    when it closes, which a log file showed as a line "^[[A"."""
    out = io.StringIO()
    outer = progress.bar(total=2, desc="train dpo", unit="step", stream=out)
    for _ in progress.bar(range(2), desc="evaluate (8 pairs)", stream=out, leave=False):
        pass
    outer.update(2)
    outer.close()
    text = out.getvalue()
    assert "\x1b" not in text
    assert all(line.startswith(("train dpo: ", "evaluate (8 pairs): ")) for line in text.splitlines())


def test_a_bar_on_a_file_carries_its_postfix():
    """The training loss rides on the bar (set_postfix); a log file showed the count alone."""
    out = io.StringIO()
    bar = progress.bar(total=2, desc="train dpo", unit="step", stream=out)
    bar.set_postfix(loss="0.6931", refresh=False)
    bar.update(2)
    bar.close()
    assert out.getvalue().splitlines()[-1].endswith("00:00 left, loss=0.6931")


def test_a_bar_on_a_terminal_redraws_in_place_and_an_off_bar_is_silent():
    tty = Terminal()
    with progress.bar(total=2, desc="generate", stream=tty) as bar:
        bar.update(2)
    assert "\r" in tty.getvalue()
    off = io.StringIO()
    with progress.bar(total=2, desc="generate", stream=off, enabled=False) as bar:
        bar.update(2)
    assert off.getvalue() == ""


@pytest.mark.parametrize(
    ("on", "stream", "shown"),
    [(False, Terminal(), False), (True, io.StringIO(), False), (True, Terminal(), True)],
    ids=["progress-off", "not-a-terminal", "progress-on-a-terminal"],
)
def test_library_bars_follow_progress_and_the_terminal_and_are_set_back(on, stream, shown):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with progress.library_bars(on, stream):
        assert hf_logging.is_progress_bar_enabled() is shown
        assert are_progress_bars_disabled() is not shown
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # a user's own choice is kept too
    try:
        with progress.library_bars(True, Terminal()):
            assert not hf_logging.is_progress_bar_enabled()
        with progress.library_bars(False, Terminal()):
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
