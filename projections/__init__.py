"""tierflow.projections"""
