"""What a job may use: memory and CPU limits, the cost model, the pool plan, the threading layer."""
