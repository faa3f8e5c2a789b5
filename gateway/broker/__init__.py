"""RabbitMQ: streams, confirmed publishes, the AMQP wire details."""
