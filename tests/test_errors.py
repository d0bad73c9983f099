"""sac_rag.errors: what a command-line user sees when the input is at fault."""

import pytest

from sac_rag.errors import InvalidInputError, exit_with_message


def test_a_command_exits_with_its_own_status():
    with pytest.raises(SystemExit) as exited:
        exit_with_message(lambda: 3)
    assert exited.value.code == 3


def test_bad_input_exits_with_a_one_line_message_instead_of_a_traceback():
    def main() -> int:
        raise InvalidInputError("predictions.jsonl lacks 10 of the 10 questions; run its eval command first")

    with pytest.raises(SystemExit) as exited:
        exit_with_message(main)
    assert exited.value.code == "error: predictions.jsonl lacks 10 of the 10 questions; run its eval command first"


def test_other_errors_are_not_hidden():
    def main() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        exit_with_message(main)
