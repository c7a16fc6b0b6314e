"""``magitrain COMMAND ...``: one entry point for the framework's commands.

Each command is also a module: ``magitrain train`` == ``python -m magitrain.train``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("magitrain.train", "train or resume a model from a YAML config"),
    "demo": ("magitrain.demo", "the one-command demo: data, 4-rank training, a streamed mp4"),
    "generate": ("magitrain.generate", "stream a video chunk by chunk from a checkpoint"),
    "release": ("magitrain.release", "export / import / verify release weights (safetensors)"),
    "build-shards": ("magitrain.data_pipeline.build_shards", "turn a media folder into WebDataset shards"),
    "dispatch": ("magitrain.parallel.dispatch", "print a context-parallel dispatch plan for a mask file"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: magitrain COMMAND [ARGS...]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:13s} {help_text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    if hasattr(module, "exit_at_once_on_stop"):  # a command, as with python -m: see magitrain.train.StopNow
        module.exit_at_once_on_stop = True
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
