"""The test suite (a package, so that tests and scripts import its helpers one way)."""
