"""The `tokenfactory` command line (`cli.main`), above `jobs` and `serve`."""
