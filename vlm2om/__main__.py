"""``python -m vlm2om``: the same CLI as the ``vlm2om`` command."""
from vlm2om.exporters.cli.main import main

main()
