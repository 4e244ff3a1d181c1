# The official Airflow image plus what butler-memory needs and the image lacks. Versions are the
# pins of requirements.txt (tests/deploy checks they agree). apache-airflow is named again so pip
# can never upgrade or downgrade the Airflow the image ships.
FROM apache/airflow:3.3.2-python3.11

RUN pip install --no-cache-dir \
    apache-airflow==3.3.2 \
    apache-airflow-providers-celery==3.26.0 \
    celery==5.5.3 \
    apache-airflow-providers-mongo==5.5.1 \
    apache-airflow-providers-redis==4.7.1 \
    openai==3.57.0 \
    statsd==4.0.1 \
    lingua-language-detector==2.1.1 \
    snowballstemmer==3.1.1 \
    quicktok-v1==0.4.0
