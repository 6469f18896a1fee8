"""tierflow.api"""
