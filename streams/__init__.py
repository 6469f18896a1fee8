"""tierflow.streams"""
