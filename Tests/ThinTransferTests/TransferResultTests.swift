import FoundationEssentials
import Testing
@testable import ThinTransfer

/// What `import --json` and `export --json` print: sorted keys, and they read back.
@Suite struct TransferResultTests {
    func roundTrip<T: Codable & Equatable>(_ type: T.Type, _ line: String) throws {
        let value = try JSONDecoder().decode(type, from: Data(line.utf8))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        #expect(String(decoding: try encoder.encode(value), as: UTF8.self) == line)
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        #expect(try JSONDecoder().decode(type, from: try encoder.encode(value)) == value)
    }

    @Test func importResult() throws {
        try roundTrip(
            ImportResult.self,
            #"{"bytes_read":33554432,"bytes_written":4096,"volume":{"connections":0,"created":1795300000,"ephemeral":false,"kind":"volume","mapped_bytes":4096,"name":"disk","origin":null,"parent":null,"read_only":false,"size":33554432,"uuid":"6c8b61fd-7f77-4d85-9c8d-c00a4a0a1da8"}}"#
        )
    }

    @Test func exportResult() throws {
        let result = ExportResult(name: "vm@s", destination: "/tmp/out.raw", bytes: 1 << 20, bytesWritten: 4096)
        try roundTrip(ExportResult.self, #"{"bytes":1048576,"bytes_written":4096,"destination":"/tmp/out.raw","name":"vm@s"}"#)
        #expect(try JSONDecoder().decode(ExportResult.self, from: Data(#"{"bytes":1048576,"bytes_written":4096,"destination":"/tmp/out.raw","name":"vm@s"}"#.utf8)) == result)
    }
}
