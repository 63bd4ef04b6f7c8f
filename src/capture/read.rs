//! Reading captures back: TCP reassembly from pcapng (ours, or any LINKTYPE_RAW / Ethernet
//! capture of port 23779), then the codec over each stream direction.
