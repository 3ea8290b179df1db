"""mmsec's test fixtures: mmsec_registry, tiny_model, tiny_data, run_context."""

pytest_plugins = ["mmsec.testing"]
