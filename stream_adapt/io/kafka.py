"""Kafka edges of the service: the consumer-group source and the model/log/dead-letter publisher.

`KafkaSource` (io/kafka_source.py) implements the `Source` protocol, `KafkaSink` (io/kafka_sink.py)
the `Sink` protocol; topic administration lives in io/admin.py. See docs/DESIGN-kafka.md for the
topics, routing and guarantees these classes implement.
"""

from stream_adapt.io.kafka_sink import KafkaSink
from stream_adapt.io.kafka_source import KafkaSource, RebalanceListener

__all__ = ["KafkaSink", "KafkaSource", "RebalanceListener"]
