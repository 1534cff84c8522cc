def pytest_configure(config):
    # markers transformers' test mixins use
    for marker in ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test",
                   "torch_export_test", "generate", "accelerate_tests", "is_training_test", "training_ci", "is_flaky"):
        config.addinivalue_line("markers", f"{marker}: used by transformers' common model tests")
