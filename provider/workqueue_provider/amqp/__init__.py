"""AMQP core shared by the Airflow hook and the worker-side consumer. Imports no Airflow, configures no logging."""
