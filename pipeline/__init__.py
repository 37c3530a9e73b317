"""Plain-Python stages of facemine: no Prefect, no SQL, no global state."""
