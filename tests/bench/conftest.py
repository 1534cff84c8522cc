from tests.eval.fixtures import corpus, trained_model  # noqa: F401  (fixtures)
