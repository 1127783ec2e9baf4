"""The bundled demo model: synthetic captioned shapes and an analytic detector (see shapes, detector)."""
