"""The command line describes itself: every option of every command has help and its default."""

import argparse

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
