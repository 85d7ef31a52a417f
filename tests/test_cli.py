"""The command line describes itself: every option of every command has help and its default."""

import argparse

import pytest

from jax_sp.cli import build_parser


def test_every_option_has_help_with_its_default():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"inspect", "generate", "serve", "launch-local", "convert"}
    for name, parser in sub.choices.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            if action.option_strings:
                assert "(default: %(default)s)" in formatter._get_help_string(action), (
                    name, action.dest)
        parser.format_help()  # every help string formats


def test_serve_s_prefill_chunk_takes_0_or_a_bucket_s_worth_of_tokens(capsys):
    parser = build_parser()
    base = ["serve", "--model", "smollm2"]
    assert parser.parse_args(base).prefill_chunk == 2048
    assert parser.parse_args(base + ["--prefill-chunk", "0"]).prefill_chunk == 0
    assert parser.parse_args(base + ["--prefill-chunk", "512"]).prefill_chunk == 512
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(base + ["--prefill-chunk", "8"])
    assert exit_.value.code == 2
    assert "must be 0 (prompts prefilled whole) or at least 16 tokens" in capsys.readouterr().err
