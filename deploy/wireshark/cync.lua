-- Wireshark dissector for the GE Cync (Xlink) device <-> cloud protocol, as relayed and captured
-- by cync-mitm. Decodes the outer frame (type, length, id, msg), the 0x23 handshake, and the
-- 0x7e-framed inner frame of 0x73/0x83 (seq, direction, opcode, length, checksum with status),
-- with power / brightness / colour of commands and status announcements. Frames split across TCP
-- segments are reassembled. Registered on TCP 23779 and 23778, plus a heuristic so cync-mitm
-- captures on other ports decode too.
--
-- Install: copy to ~/.local/lib/wireshark/plugins/ (or run `tshark -X lua_script:cync.lua ...`).
-- Protocol reference: docs/protocol.md in the cync-mitm repository.

local cync = Proto("cync", "GE Cync (Xlink) protocol")

local type_names = {
  [0x13] = "login", [0x18] = "login_result", [0x23] = "handshake", [0x28] = "handshake_ack",
  [0x43] = "sync", [0x48] = "sync_ack", [0x73] = "pipe", [0x78] = "pipe_status",
  [0x7b] = "pipe_ack", [0x83] = "pipe_sync", [0x88] = "pipe_sync_ack", [0xa3] = "probe",
  [0xa8] = "probe_status", [0xab] = "probe_reply", [0xc3] = "time_request",
  [0xc8] = "time_answer", [0xd3] = "ping", [0xd8] = "pong", [0xe3] = "disconnect",
}
local dir_names = { [0xf8] = "request", [0xf9] = "response", [0xfa] = "announce" }
local MAX_FRAME = 65536

local f = cync.fields
f.type = ProtoField.uint8("cync.type", "Type", base.HEX, type_names)
f.type_name = ProtoField.string("cync.type_name", "Type name")
f.len = ProtoField.uint32("cync.len", "Body length", base.DEC)
f.id = ProtoField.uint32("cync.id", "Id", base.HEX)
f.msg = ProtoField.bytes("cync.msg", "Message field")
f.device_id = ProtoField.uint32("cync.device_id", "Device id", base.HEX)
-- The id as cync-mitm prints it everywhere (logs, file names, JSON, cohort): 8 hex digits.
-- Filter with cync.device == "38e8cf46"; the numeric fields stay for ranges.
f.device = ProtoField.string("cync.device", "Device (as in cync-mitm)")
f.auth_code = ProtoField.string("cync.auth_code", "Authorize code")
f.inner = ProtoField.bytes("cync.inner", "Inner frame")
f.inner_seq = ProtoField.uint32("cync.inner.seq", "Sequence", base.DEC)
f.inner_dir = ProtoField.uint8("cync.inner.dir", "Direction", base.HEX, dir_names)
f.inner_dir_name = ProtoField.string("cync.inner.dir_name", "Direction name")
f.inner_opcode = ProtoField.uint8("cync.inner.opcode", "Opcode", base.HEX)
f.inner_len = ProtoField.uint16("cync.inner.len", "Data length", base.DEC)
f.inner_checksum = ProtoField.uint8("cync.inner.checksum", "Checksum", base.HEX)
f.inner_checksum_status = ProtoField.string("cync.inner.checksum_status", "Checksum status")
f.mesh_id = ProtoField.uint16("cync.mesh_id", "Mesh id", base.DEC)
f.power = ProtoField.bool("cync.power", "Power")
f.brightness = ProtoField.uint8("cync.brightness", "Brightness", base.DEC)
f.color_temp = ProtoField.uint8("cync.color_temp", "Colour temperature", base.DEC)
f.rgb = ProtoField.string("cync.rgb", "RGB")

local ef_checksum = ProtoExpert.new("cync.checksum_bad", "Inner frame checksum is wrong",
  expert.group.CHECKSUM, expert.severity.WARN)
local ef_malformed = ProtoExpert.new("cync.malformed", "Inner frame is malformed",
  expert.group.MALFORMED, expert.severity.WARN)
cync.experts = { ef_checksum, ef_malformed }

-- Un-escapes 7d 5e -> 7e and 7d 5d -> 7d; any other 7d stays literal.
local function unescape(tvb_range)
  local src = tvb_range:bytes()
  local out = ByteArray.new()
  out:set_size(src:len())
  local n, i = 0, 0
  while i < src:len() do
    local b = src:get_index(i)
    local nb = (i + 1 < src:len()) and src:get_index(i + 1) or -1
    if b == 0x7d and nb == 0x5e then
      out:set_index(n, 0x7e); i = i + 2
    elseif b == 0x7d and nb == 0x5d then
      out:set_index(n, 0x7d); i = i + 2
    else
      out:set_index(n, b); i = i + 1
    end
    n = n + 1
  end
  out:set_size(n)
  return out
end

local function add_state(tree, t, on_off, bri, ct, r, g, b)
  tree:add(f.power, t(on_off, 1))
  tree:add(f.brightness, t(bri, 1))
  if t(ct, 1):uint() == 0xfe then
    tree:add(f.rgb, t(r, 3), string.format("%02x%02x%02x", t(r, 1):uint(), t(g, 1):uint(), t(b, 1):uint()))
  else
    tree:add(f.color_temp, t(ct, 1))
  end
end

local function dissect_inner(wire, pinfo, tree)
  local opener = wire(0, 1):uint()
  local last = wire(wire:len() - 1, 1):uint()
  local itree = tree:add(f.inner, wire)
  if (opener ~= 0x7e and opener ~= 0x00) or last ~= 0x7e or wire:len() < 11 then
    itree:add_proto_expert_info(ef_malformed, "bad delimiters")
    return nil
  end
  local plain = unescape(wire(1, wire:len() - 2))
  local t = plain:tvb("Un-escaped inner frame")
  if t:len() < 9 then
    itree:add_proto_expert_info(ef_malformed, "too short")
    return nil
  end
  local dlen = t(6, 2):le_uint()
  if t:len() ~= 9 + dlen then
    itree:add_proto_expert_info(ef_malformed, "length field disagrees with the frame")
    return nil
  end
  itree:add_le(f.inner_seq, t(0, 4))
  local dir = t(4, 1):uint()
  itree:add(f.inner_dir, t(4, 1))
  itree:add(f.inner_dir_name, t(4, 1), dir_names[dir] or string.format("0x%02x", dir))
  local op = t(5, 1):uint()
  itree:add(f.inner_opcode, t(5, 1))
  itree:add_le(f.inner_len, t(6, 2))
  local sum = op + t(6, 1):uint() + t(7, 1):uint()
  for i = 0, dlen - 1 do sum = sum + t(8 + i, 1):uint() end
  sum = sum % 256
  local ck = t(8 + dlen, 1):uint()
  itree:add(f.inner_checksum, t(8 + dlen, 1))
  if ck == sum then
    itree:add(f.inner_checksum_status, t(8 + dlen, 1), "good")
  else
    itree:add(f.inner_checksum_status, t(8 + dlen, 1), "bad")
    itree:add_proto_expert_info(ef_checksum, string.format("checksum 0x%02x, expected 0x%02x", ck, sum))
  end
  local d = 8
  if dir == 0xf8 and (op == 0xd0 or op == 0xd2 or op == 0xe2 or op == 0xf0) and dlen >= 11 then
    itree:add_le(f.mesh_id, t(d + 5, 2))
    local a = d + 10
    if op == 0xd0 then
      itree:add(f.power, t(a, 1))
    elseif op == 0xd2 then
      itree:add(f.brightness, t(a, 1))
    elseif op == 0xe2 and t(a, 1):uint() == 0x05 and dlen >= 12 then
      itree:add(f.color_temp, t(a + 1, 1))
    elseif op == 0xe2 and t(a, 1):uint() == 0x04 and dlen >= 14 then
      itree:add(f.rgb, t(a + 1, 3), string.format("%02x%02x%02x", t(a + 1, 1):uint(), t(a + 2, 1):uint(), t(a + 3, 1):uint()))
    elseif op == 0xf0 and dlen >= 16 then
      itree:add(f.power, t(a, 1))
      if t(a + 1, 1):uint() ~= 0xff then itree:add(f.brightness, t(a + 1, 1)) end
      local mode = t(a + 2, 1):uint()
      if mode == 0xfe then
        itree:add(f.rgb, t(a + 3, 3), string.format("%02x%02x%02x", t(a + 3, 1):uint(), t(a + 4, 1):uint(), t(a + 5, 1):uint()))
      elseif mode ~= 0xff then
        itree:add(f.color_temp, t(a + 2, 1))
      end
    end
  elseif dir == 0xfa and op == 0xdb and dlen == 0x13 then
    itree:add_le(f.mesh_id, t(d + 3, 2))
    add_state(itree, t, d + 11, d + 12, d + 13, d + 14, d + 15, d + 16)
  end
  return string.format("%s %02x", dir_names[dir] or string.format("%02x", dir), op)
end

local function frame_len(tvb, pinfo, offset)
  return 5 + tvb(offset + 1, 4):uint()
end

local function dissect_frame(tvb, pinfo, tree)
  local ty = tvb(0, 1):uint()
  local len = tvb(1, 4):uint()
  local name = type_names[ty] or "unknown"
  local st = tree:add(cync, tvb(), string.format("Cync %s (0x%02x), %d bytes", name, ty, len))
  st:add(f.type, tvb(0, 1))
  st:add(f.type_name, tvb(0, 1), name)
  st:add(f.len, tvb(1, 4))
  local info = name
  local body = tvb:len() - 5
  if ty == 0x23 and body >= 7 then
    st:add(f.device_id, tvb(6, 4))
    st:add(f.device, tvb(6, 4), string.format("%08x", tvb(6, 4):uint()))
    local alen = tvb(10, 2):uint()
    if 12 + alen <= tvb:len() then
      st:add(f.auth_code, tvb(12, alen))
    end
    info = string.format("handshake device=%08x", tvb(6, 4):uint())
  elseif (ty == 0x43 or ty == 0x73 or ty == 0x7b or ty == 0x78 or ty == 0x83 or ty == 0xa3 or ty == 0xa8) and body >= 7 then
    st:add(f.id, tvb(5, 4))
    st:add(f.device, tvb(5, 4), string.format("%08x", tvb(5, 4):uint()))
    st:add(f.msg, tvb(9, 3))
    info = string.format("%s id=%08x msg=%s", name, tvb(5, 4):uint(), tostring(tvb(9, 3):bytes()))
    if (ty == 0x73 or ty == 0x83) and body > 7 then
      local what = dissect_inner(tvb(12, body - 7), pinfo, st)
      if what then info = info .. " " .. what end
    end
  elseif (ty == 0x48 or ty == 0x88) and body == 3 then
    st:add(f.msg, tvb(5, 3))
    info = string.format("%s msg=%s", name, tostring(tvb(5, 3):bytes()))
  end
  pinfo.cols.protocol = "CYNC"
  local old = tostring(pinfo.cols.info)
  if old:find("CYNC ", 1, true) then
    pinfo.cols.info:append(", " .. info)
  else
    pinfo.cols.info = "CYNC " .. info
  end
  return tvb:len()
end

function cync.dissector(tvb, pinfo, tree)
  dissect_tcp_pdus(tvb, tree, 5, frame_len, dissect_frame)
  return tvb:len()
end

local function heuristic(tvb, pinfo, tree)
  if tvb:len() < 5 then return false end
  local ty = tvb(0, 1):uint()
  if not type_names[ty] then return false end
  local len = tvb(1, 4):uint()
  if len + 5 > MAX_FRAME then return false end
  pinfo.conversation = cync
  cync.dissector(tvb, pinfo, tree)
  return true
end

local tcp_port = DissectorTable.get("tcp.port")
tcp_port:add(23779, cync)
tcp_port:add(23778, cync)
cync:register_heuristic("tcp", heuristic)
