"""AMQP core shared by the Airflow hook and the worker-side consumer. Imports no Airflow."""

import logging

# pika logs every connection step at INFO and every broker channel close at WARNING, which floods
# task logs; our own errors already say what went wrong.
logging.getLogger("pika").setLevel(logging.WARNING)
logging.getLogger("pika.channel").setLevel(logging.ERROR)
