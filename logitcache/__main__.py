"""Allow `python -m logitcache`."""

from logitcache.cli import main

main()
