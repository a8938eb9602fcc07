"""How DiGSeg models meet the Hugging Face Hub: model cards, file resolution with one offline policy, and the
saved-folder layout that stock diffusers loads.
"""
