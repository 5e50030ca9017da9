"""The ``fogpay`` command: a thin dispatcher over the subcommands of each package."""
