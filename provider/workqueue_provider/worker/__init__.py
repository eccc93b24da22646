"""Worker side: runs inside the Job's pods. Imports nothing from Airflow (checked by import-linter)."""
