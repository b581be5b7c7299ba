"""The main job: suites, fine-tuning grid, merge search, reports (``saft reproduce``)."""
