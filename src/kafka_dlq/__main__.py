from kafka_dlq.cli import main

main()
