"""Driver side of a job (Spark session, pre-flight, control channel) and the task agent."""
