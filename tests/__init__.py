"""The test suite of tract_optim; ``tests.kit`` holds what the tests share."""
