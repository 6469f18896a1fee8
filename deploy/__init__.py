"""tierflow.deploy"""
