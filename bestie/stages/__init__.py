"""bestie.stages"""
