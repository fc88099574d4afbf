"""Training MedT-family models with ``model.fit`` (the official recipe).

The package is declared here so the project installs its three modules;
its training entry points are the subject of the training work item and
are not written yet.
"""
