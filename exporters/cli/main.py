"""The ``vlm2om`` command line: the group and its commands, one module per command group.
No command imports torch until it needs it, so ``run``, ``chat``, ``lint``, ``compile``,
``verify --golden`` and ``bench`` work on a deploy box that has only the runtime installed."""
from __future__ import annotations

import click

from vlm2om.exporters.cli import ascend, bench, export, serve, verify
from vlm2om.exporters.cli.common import Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """vlm2om: export vision-language models to static ONNX subgraphs for Ascend ATC,
    and run the resulting bundle with a KV-cache decoder."""


for _command in (export.export, serve.run, serve.chat, ascend.lint, ascend.compile_, verify.verify, bench.bench):
    main.add_command(_command)

if __name__ == "__main__":
    main()
